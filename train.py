"""Entry point: `horovodrun -np N python train.py --flagfile=configs/cpu_demo.cfg` (see README)."""

from horovod_mlstm.train import entry

if __name__ == "__main__":
    entry()
