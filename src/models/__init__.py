"""Model families behind one adapter contract: loading, encoding (E_pre, E_post), captioning, module capture."""
