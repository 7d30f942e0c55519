"""What LXMERT learns and how it is measured: datasets, answer tables, metrics, training."""
