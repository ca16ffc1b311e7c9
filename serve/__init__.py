"""OpenAI-compatible serving of a Hugging Face model folder on Ray Serve. Imports nothing from jobs/."""
