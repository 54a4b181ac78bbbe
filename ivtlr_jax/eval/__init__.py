"""Evaluation: answer scoring (REFERENCE.md section 4) and pictures of the selected patches."""
