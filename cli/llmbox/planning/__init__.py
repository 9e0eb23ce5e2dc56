"""The planner's rules, one topic a module; `llmbox.plan` puts them together into one `TrainingPlan`."""
