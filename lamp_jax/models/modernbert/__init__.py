"""ModernBERT (``modeling.py``) and its Hugging Face checkpoints' key table (``params.py``)."""
