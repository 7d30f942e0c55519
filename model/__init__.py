"""The LXMERT cross-modality network, state-dict compatible with transformers."""
