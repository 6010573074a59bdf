"""The shared API and wire types: the custom resources and their validation, the control
channel's messages, conditions and the generated CRDs. Imports nothing else of kakuremichi."""
