"""JSONL -> .bin/.idx preprocessing (tools/preprocess_data.py): reader, cleaning, workers, writer."""
