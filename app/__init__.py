"""The Gradio personalization web app (to be built: issue 10), on the trainer's library API
(:func:`adaprelora_diffusion.dreambooth.train`), never on a copy of its loop.
"""
