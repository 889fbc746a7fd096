import gipc

def test_round_trip():
    with gipc.pipe() as (r, w):
        w.put(1)
        assert r.get() == 1

def _child(r):
    assert r.get() == "hi"

def test_child():
    with gipc.pipe() as (r, w):
        p = gipc.start_process(_child, args=(r,))
        w.put("hi")
        p.join()
        assert p.exitcode == 0
