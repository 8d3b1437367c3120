"""The HTTP routes, one router per concern; each handler reads what it needs from `request.app.state`
(engine, config, images, metrics, weights, ready...), which `server.app.create_app` sets."""
