"""Text: prompt templates (``prompts``, ``chat_template``) and tokenizers (``tokenization``, ``tokenizer_files``)."""
