"""Multi-turn agentic rollouts: environments, tools and the token-in/token-out episode loop."""
