"""Ray Serve app over models/: OpenAI protocol, ingress, image and chat deployments, auth, limits, safety."""
