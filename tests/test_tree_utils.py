"""vsd_ext.tree: depths, root-to-node paths and the packed visibility mask from a parents array,
checked against a node-by-node walk (the obvious oracle; the module itself is vectorized)."""
import pytest
import torch

from vsd_ext import tree


def walk_oracle(parents: torch.Tensor, valid: torch.Tensor | None = None):
    """Per node: the list of nodes from the root to it (None for padding)."""
    B, N = parents.shape
    out = []
    for b in range(B):
        row = []
        for i in range(N):
            real = (i == 0 or parents[b, i] >= 0) and (valid is None or bool(valid[b, i]))
            if not real:
                row.append(None)
                continue
            path = [i]
            while parents[b, path[-1]] >= 0:
                path.append(int(parents[b, path[-1]]))
            row.append(path[::-1])
        out.append(row)
    return out


def check_against_oracle(parents, valid=None):
    B, N = parents.shape
    oracle = walk_oracle(parents.cpu(), None if valid is None else valid.cpu())
    depths = tree.tree_depths(parents, valid).cpu()
    paths = tree.tree_paths(parents, valid).cpu()
    dense = tree.unpack_tree_mask(tree.build_tree_mask(parents, valid), N).cpu()
    max_depth = max((len(p) - 1 for row in oracle for p in row if p is not None), default=0)
    assert paths.shape == (B, N, max_depth + 1)
    for b in range(B):
        for i in range(N):
            path = oracle[b][i]
            if path is None:
                assert depths[b, i] == -1
                assert (paths[b, i] == -1).all()
                assert not dense[b, i].any()
                continue
            assert depths[b, i] == len(path) - 1
            assert paths[b, i, : len(path)].tolist() == path
            assert (paths[b, i, len(path):] == -1).all()
            expected = torch.zeros(N, dtype=torch.bool)
            expected[path] = True
            assert torch.equal(dense[b, i], expected)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 130, 200])
def test_random_trees_match_walk(device, gen, n):
    parents = tree.random_parents(3, n, generator=gen, device=device)
    check_against_oracle(parents)


def test_chain_is_causal(device):
    n = 130
    parents = tree.chain_parents(2, n, device=device)
    dense = tree.unpack_tree_mask(tree.build_tree_mask(parents), n)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    assert torch.equal(dense, causal.expand(2, n, n))
    assert torch.equal(tree.tree_depths(parents), torch.arange(n, device=device).expand(2, n))
    paths = tree.tree_paths(parents)
    assert torch.equal(paths[:, -1], torch.arange(n, device=device).expand(2, n))


def test_star_and_wide_trees(device):
    n = 70
    star = torch.zeros(1, n, dtype=torch.int64, device=device)
    star[0, 0] = -1
    check_against_oracle(star)
    assert tree.tree_paths(star).shape == (1, n, 2)


def test_padding_nodes(device, gen):
    n = 80
    parents = tree.random_parents(4, n, generator=gen, device=device)
    # Padding by a negative parent: the last 10 nodes of row 1 (nobody below them is real).
    parents[1, n - 10:] = -1
    # Padding by `valid`: leaves of row 2 (nodes that are nobody's parent) and all of row 3.
    valid = torch.ones(4, n, dtype=torch.bool, device=device)
    is_parent = torch.zeros(n, dtype=torch.bool, device=device)
    is_parent[parents[2, 1:]] = True
    valid[2] = is_parent
    valid[2, 0] = True
    valid[3] = False
    check_against_oracle(parents, valid)
    mask = tree.build_tree_mask(parents, valid)
    assert (mask[3] == 0).all() and (mask[1, n - 10:] == 0).all()


def test_pack_unpack_roundtrip(device, gen):
    dense = torch.rand(3, 5, 130, generator=gen).lt(0.5).to(device)
    dense[..., 63] = True  # the sign bit of word 0
    dense[..., 127] = True
    packed = tree.pack_tree_mask(dense)
    assert packed.shape == (3, 5, 3) and packed.dtype == torch.int64
    assert (packed[..., 0] < 0).all()  # bit 63 is the sign bit
    assert torch.equal(tree.unpack_tree_mask(packed, 130), dense)
    # bit j % 64 of word j // 64
    j = 70
    bit = (packed[..., j // 64] >> (j % 64)) & 1
    assert torch.equal(bit.bool(), dense[..., j])


def test_append_nodes_matches_build(device, gen):
    """Growing a tree in chunks (each node's parent in an earlier chunk, some padding, across
    the 64-node word boundaries) gives build_tree_mask's mask and tree_depths' depths."""
    B, sizes = 3, [1, 5, 1, 40, 30, 3, 60]
    parents = torch.full((B, 1), -1, dtype=torch.int64)
    mask = tree.build_tree_mask(parents.to(device))
    depths = tree.tree_depths(parents.to(device))
    for n in sizes:
        P = parents.shape[1]
        real = parents >= 0
        real[:, 0] = True
        # Each new node picks a random real earlier node; about one in five is padding.
        weights = real.float().repeat_interleave(n, 0)
        new = torch.multinomial(weights, 1, generator=gen).view(B, n)
        new[torch.rand(B, n, generator=gen) < 0.2] = -1
        parents = torch.cat((parents, new), 1)
        mask, depths = tree.append_nodes(mask, depths, new.to(device))
        assert mask.shape == (B, P + n, (P + n + 63) // 64)
    assert parents.shape[1] > 128
    assert torch.equal(mask, tree.build_tree_mask(parents.to(device)))
    assert torch.equal(depths, tree.tree_depths(parents.to(device)))


def test_append_child_is_append_nodes(device, gen):
    """One child of the same node per row (a chain's next level): append_child ==
    append_nodes, also where the child opens a new 64-bit word."""
    for n in (5, 64, 100):
        parents = tree.random_parents(3, n, generator=gen, device=device)
        mask, depths = tree.build_tree_mask(parents), tree.tree_depths(parents)
        parent = int(torch.randint(0, n, (), generator=gen))
        same = torch.full((3, 1), parent, dtype=torch.int64, device=device)
        got = tree.append_child(mask, depths, parent)
        ref = tree.append_nodes(mask, depths, same)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize(
    "parents, match",
    [
        (torch.tensor([[0, 0, 1]]), r"parents\[:, 0\] == -1"),
        (torch.tensor([[-1, 2, 0]]), r"\(topological order\), got parents\[0, 1\] = 2"),
        (torch.tensor([[-1, 0, 5]]), r"topological order"),
        (torch.tensor([[-1, -1, 1]]), r"real node 2 of row 0 has padding node 1 as its parent"),
        (torch.tensor([[-1, 0, 1]], dtype=torch.int32), r"expected dtype torch.int64"),
        (torch.tensor([-1, 0, 1]), r"expected a \[B, N\] tensor"),
    ],
)
def test_bad_parents(parents, match):
    with pytest.raises(ValueError, match=match):
        tree.build_tree_mask(parents)


def test_bad_valid():
    parents = tree.chain_parents(2, 4)
    with pytest.raises(ValueError, match="argument 'valid'"):
        tree.build_tree_mask(parents, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="argument 'valid'"):
        tree.build_tree_mask(parents, torch.ones(2, 4))


@pytest.mark.parametrize("levels,paths", [(1, 1), (5, 1), (3, 4), (70, 1), (9, 8)])
def test_chain_mask_is_the_tree_mask_of_its_chains(levels, paths):
    """chain_mask(levels, paths): S chains below a root that is not a node (it lives in the
    cache), level-major; build_tree_mask of the same chains below an explicit root agrees."""
    n = levels * paths
    node = torch.arange(n)
    parents = torch.where(node < paths, 0, node - paths + 1)  # node i is tree node i + 1
    parents = torch.cat((torch.tensor([-1]), parents))[None]
    expected = tree.unpack_tree_mask(tree.build_tree_mask(parents), n + 1)[:, 1:, 1:]
    got = tree.unpack_tree_mask(tree.chain_mask(levels, "cpu", paths), n)
    assert torch.equal(got, expected)
    assert tree.chain_mask(levels, "cpu", paths) is tree.chain_mask(levels, "cpu", paths)


@pytest.mark.parametrize("n", [1, 5, 70])
def test_empty_batch(device, n):
    """B = 0 rows: empty results of the right shapes (issue #17: internal errors before)."""
    parents = torch.zeros(0, n, dtype=torch.int64, device=device)
    assert tree.tree_depths(parents).shape == (0, n)
    assert tree.tree_paths(parents).shape == (0, n, 1)
    assert tree.build_tree_mask(parents).shape == (0, n, (n + 63) // 64)
    valid = torch.zeros(0, n, dtype=torch.bool, device=device)
    assert tree.build_tree_mask(parents, valid).shape == (0, n, (n + 63) // 64)
