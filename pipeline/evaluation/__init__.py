"""Evaluation: retrieval and zero-shot, metrics, linear probe and fine-tune, VQA, the retrieval sheet, reports, CKA."""
