"""The Llama architecture: Llama, Qwen2 and Qwen3 (``modeling.py``), their Hugging Face
checkpoints' key table (``params.py``) and their transformers-style random initialisation
(``initialization.py``)."""
