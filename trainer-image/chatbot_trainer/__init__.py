"""Trainer steps for ChatbotTraining: prepare, configure, train, evaluate, export."""
