"""Weight conversions for offline models (CTranslate2 Whisper, GGUF Llama): no Hub files import these."""
