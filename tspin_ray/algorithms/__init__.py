"""The objectives' math: losses, the log-probs they need, one step's inputs. Pure torch: no Ray, no I/O."""
