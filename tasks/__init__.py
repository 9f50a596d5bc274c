"""Built-in bilevel problems."""
