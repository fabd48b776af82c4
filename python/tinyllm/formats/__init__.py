"""Model file formats, one module each: llama2c (.bin, tok.bin), gguf, hf (safetensors directories),
checkpoint (training state, needs torch), spmodel (SentencePiece .model), with weights.py as the one
vocabulary of tensor names they share and convert.py reading any of them and writing any other."""
