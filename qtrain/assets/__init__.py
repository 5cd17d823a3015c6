"""Bundled sample data (see README.md here): paths for the default job and the tests."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
SAMPLE_CORPUS = ASSETS_DIR / "sample_corpus.jsonl"  # {"text": ...} documents, public-domain Shakespeare
SAMPLE_ALPACA = ASSETS_DIR / "sample_alpaca.jsonl"  # Alpaca-format instruction records, generated
SAMPLE_PREFERENCE = ASSETS_DIR / "sample_preference.jsonl"  # the same records as chosen/rejected pairs, generated
