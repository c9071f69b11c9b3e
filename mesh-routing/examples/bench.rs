//! `cargo run -p mesh-routing --release --example bench`: the cost of a
//! routing decision with 10, 100, 1 000 and 10 000 routed services.

fn main() {
    for n in [10, 100, 1_000, 10_000] {
        let r = mesh_routing::bench::bench_decision(n, 1_000_000);
        println!(
            "{:>6} routes in the mesh: {:>5} ns per decision (route + endpoint pick)",
            r.routes_in_mesh,
            r.per_decision().as_nanos()
        );
    }
}
