"""Corpus → cleaned documents → tokenizer → packed token blocks, on Ray Data."""
