"""Evaluation: answer scoring (docs/method.md section 18) and pictures of the selected patches."""
