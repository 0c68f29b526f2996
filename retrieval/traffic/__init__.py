"""Traffic: the search log and the feedback events users send about it (`log`), and what they
say in aggregate (`stats`). Training pairs made from them are `training.feedback_pairs`'."""
