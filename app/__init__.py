"""The adaprelora web app (Gradio): upload photos, train a DreamBooth LoRA in a background worker,
compare samples, download the files. Built on the trainer's library API
(:func:`adaprelora_diffusion.dreambooth.train`), never on a copy of its loop; the package never
imports this one.

Modules, one concept each: ``cli`` (the command), ``ui`` (the page and the API endpoints),
``service`` (what they do, without Gradio), ``workspace`` and ``jobs`` (folders and states),
``scheduler`` (the queue), ``worker`` (one job's process), ``events`` (progress as a file),
``settings``, ``presets``, ``models``, ``uploads``, ``captions`` (input checks), ``sampling``
and ``exports`` (outputs).
"""
