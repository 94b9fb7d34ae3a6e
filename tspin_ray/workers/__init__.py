"""Code that runs inside Ray actors: engines, the generation stage, generator pool, trainer rank, weight moves."""
