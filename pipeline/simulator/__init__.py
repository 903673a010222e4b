"""The built-in simulator of a health-coaching app: events, users, foods and ground truth."""
