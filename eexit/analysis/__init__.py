"""Analyses of how predictions evolve over layers: statistics (`monotonicity`), the recipe behind
`eexit analyze-monotonicity` (`analyze`) and its figures (`plots`)."""
