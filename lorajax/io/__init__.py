"""Adapters as files: lorajax's own format and Hugging Face PEFT's."""
