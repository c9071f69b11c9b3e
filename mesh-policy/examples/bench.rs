//! `cargo run -p mesh-policy --release --example bench`: the decision cost
//! with 10, 100, 1 000 and 10 000 AuthorizationPolicies in the mesh.

fn main() {
    for n in [10, 100, 1_000, 10_000] {
        let r = mesh_policy::bench::bench_evaluate(n, 1_000_000);
        println!(
            "{:>6} policies in the mesh, {} selecting the workload: {:>5} ns per decision",
            r.policies_in_mesh,
            r.policies_selecting_workload,
            r.per_evaluation().as_nanos()
        );
    }
}
