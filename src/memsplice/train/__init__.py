"""Training the memory against the frozen reasoner: the objectives shared by offline formation and online learning."""
