"""Mirror of the parts of ``fl4health.parameter_exchange`` the server modules need to turn server
parameters into a model: full exchange, and the packers whose extras the server drops."""
