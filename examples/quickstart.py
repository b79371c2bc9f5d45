import jax, jax.numpy as jnp, gifjax

X = jax.random.normal(jax.random.key(0), (200, 5)); y = (X @ jnp.arange(5.0) > 0).astype(jnp.float32)
params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
def example_loss(p, xy):                       # logistic loss of one example
    logit = xy[0] @ p["w"] + p["b"]
    return jnp.logaddexp(0.0, logit) - xy[1] * logit
def loss(p, X, y):                             # training objective: mean loss + L2
    return jnp.mean(jax.vmap(example_loss, (None, 0))(p, (X, y))) + 1e-2 * p["w"] @ p["w"]
for _ in range(300):                           # train (plain gradient descent)
    params = jax.tree.map(lambda p, g: p - 1.0 * g, params, jax.grad(loss)(params, X, y))

g = gifjax.removal_gradient(loss, params, X[:10], y[:10], num_train=200)  # remove 10 examples
mask = {"w": jnp.arange(5) >= 3, "b": jnp.array(True)}            # update only w[3:], b
for method in gifjax.METHODS:
    out = gifjax.influence(loss, params, g, X[10:], y[10:], mask=mask, method=method)
    print(method, jnp.round(out.delta["w"], 4), "converged:", bool(out.converged), "HVPs:", int(out.num_hvps))
I = gifjax.influence_scores(loss, params, example_loss, (X, y), (X[:3], y[:3]), X, y)
print("influence of training point 0 on 3 test points:", I[0])   # shape [200, 3]
