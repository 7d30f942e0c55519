"""Luigi tasks that wire the extractor, model and tasks packages into one DAG."""
from pipeline.settings import use_profile

use_profile()  # before any task reads its parameters: luigi.cfg's [pipeline] profile, layered under it
