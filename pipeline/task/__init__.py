"""The task: its file (config), typed extra outputs, and the prompt built from them."""
