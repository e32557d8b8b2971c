"""Multiple-choice evaluation: C-Eval, CMMLU, MMLU, XieZhi (`cutegpt eval`)."""
