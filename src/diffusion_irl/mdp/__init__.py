"""The sampling MDP: state, knob / transition actions, policies."""
