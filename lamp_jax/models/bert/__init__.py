"""The BERT family: BERT, RoBERTa and DistilBERT (``modeling.py``) and their Hugging Face
checkpoints' key tables (``params.py``)."""
