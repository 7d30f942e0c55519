"""Datasets: raw readers, answer tables, tokenization, preprocessing into LXMERT's files, features."""
