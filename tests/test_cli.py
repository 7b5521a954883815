from lightning_reg.cli import main


def test_demo_trains_and_prints_test_accuracy(capsys):
    main(["demo", "--epochs", "1"])
    out = capsys.readouterr().out
    assert "cnn_small on digits: test accuracy" in out
