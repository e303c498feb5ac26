"""Recipes: public raw dataset layouts -> WebDataset shards (``python -m data_recipes.<name> --help``)."""
