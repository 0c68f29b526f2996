"""The runtime path of twostage: text in, ranked chunks out."""
