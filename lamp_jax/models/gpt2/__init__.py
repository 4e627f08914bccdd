"""GPT-2 (``modeling.py``), its Hugging Face checkpoints' key table (``params.py``) and its
transformers-style random initialisation (``initialization.py``)."""
