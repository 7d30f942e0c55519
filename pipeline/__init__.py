"""Luigi tasks that wire the extractor, model and tasks packages into one DAG."""
