"""Evaluation: one entry (`entry.evaluate`) over a context resolved once (`context`), the
teacher-forced exit records (`records`), and the three kinds: language modelling (`lm`), task
decoding (`tasks`) and LM-prompt decoding against full depth (`generation`)."""
