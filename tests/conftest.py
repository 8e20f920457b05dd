# Fixture modules live beside this file; fixtures_hub must load before anything imports huggingface_hub.
pytest_plugins = ["fixtures_hub", "fixtures_models"]
