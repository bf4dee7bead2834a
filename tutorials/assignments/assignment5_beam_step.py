"""Assignment 5: one step of beam search (the decoding behind the paper's E2E numbers).

Beam search keeps the `beam_size` best partial outputs ("beams"). Each step, every beam could
be extended by every token of the vocabulary; a candidate's score is its beam's score plus the
log-probability of the token. The step keeps the beam_size best candidates over *all* beams
(not the best few of each beam).

Fill in the function marked YOUR CODE HERE (replace the `raise NotImplementedError` line).
Check your work with

    python grade.py assignment5 assignment5_beam_step.py

lora_min/decode.py's beam_search does this step (plus finished hypotheses, length penalty and
n-gram blocking) for many prompts at once.
"""
import torch


def beam_step(log_probs: torch.Tensor, beam_scores: torch.Tensor, beam_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of beam search.

    log_probs:   (n_beams, V) log-probabilities of the next token for each beam.
    beam_scores: (n_beams,) total log-probability of each beam so far (-inf: an empty slot,
                 e.g. at the first step, when all beams hold the same prompt but one).
    Returns (scores, beam_index, token), each (beam_size,), best first: candidate i extends
    beam beam_index[i] with token[i] and has total score scores[i].
    """
    raise NotImplementedError  # YOUR CODE HERE
