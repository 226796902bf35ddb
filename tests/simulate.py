"""What the test Flower apps run as scripts: a simulation on a fresh local Ray, then a last line."""


def simulate(server, client, clients: int) -> None:
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}},
    )
    print("simulation returned", flush=True)
