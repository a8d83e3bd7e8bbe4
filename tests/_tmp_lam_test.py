import test_wire as tw
from test_wire import recorded, merchants
def test_show(recorded, merchants):
    for p,(table,_) in merchants.items():
        raw, sent = tw._raw_values(table), tw._sent_values(recorded["records"], p)
        print(p, raw.size, raw.min(), raw.max(), sent.size, (abs(sent)>3).sum(), tw._matches_and_allowance(sent, raw))
