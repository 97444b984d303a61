"""Where the data sets live. Edit the roots below for your machine, or pass `--data DIR` to a script.

The names are those of the original HWD/CIRKD code, so a settings.py copied from there works unchanged.
List files hold one sample a line, paths relative to the data set's root (see README, "Data
preparation"). When a list file does not exist, the list is built by scanning the data set's standard
layout under its root, and the log says so. 'None' means "not available" (COCO-Stuff has no test split).
"""

# Cityscapes: leftImg8bit/{train,val,test}/<city>/..., gtFine/{train,val,test}/<city>/...
DATA_CS = './data/cityscapes/'
DATALIST_CS_TRAIN = './dataset/list/cityscapes/train.lst'
DATALIST_CS_VAL = './dataset/list/cityscapes/val.lst'
DATALIST_CS_TEST = './dataset/list/cityscapes/test.lst'

# Pascal VOC 2012 with the SBD augmentation: JPEGImages/, SegmentationClassAug/, ImageSets/Segmentation/
DATA_VOC = './data/VOCAug/'
DATALIST_VOC_TRAIN = './dataset/list/voc/train_aug.txt'
DATALIST_VOC_VAL = './dataset/list/voc/val.txt'
DATALIST_VOC_TEST = './dataset/list/voc/test.txt'

# CamVid (SegNet's 11 classes, CIRKD's layout): train/, val/, test/ hold the images, trainannot/, valannot/,
# testannot/ the labels of the same names (all three splits are labelled). List lines, as CIRKD's:
# `train/NAME.png trainannot/NAME.png`.
DATA_CAMVID = './data/CamVid/'
DATALIST_CAMVID_TRAIN = './dataset/list/CamVid/camvid_train_list.txt'
DATALIST_CAMVID_VAL = './dataset/list/CamVid/camvid_val_list.txt'
DATALIST_CAMVID_TEST = './dataset/list/CamVid/camvid_test_list.txt'

# ADE20K (ADEChallengeData2016): images/{training,validation}/, annotations/{training,validation}/;
# the test images of the SceneParsing challenge (release_test/testing/*.jpg) have a root of their own.
DATA_ADE20K = './data/ADEChallengeData2016/'
DATA_ADE20K_TEST = './data/ADEChallengeData2016/release_test/testing/'
DATALIST_ADE20K_TRAIN = './dataset/list/ade20k/training.txt'
DATALIST_ADE20K_VAL = './dataset/list/ade20k/validation.txt'
DATALIST_ADE20K_TEST = './dataset/list/ade20k/test.txt'

# COCO-Stuff-164k (`--dataset coco`, or CIRKD's name for it, `coco_stuff_164k`): images/{train2017,val2017}/,
# annotations/{train2017,val2017}/ (stuffthingmaps)
DATA_COCO = './data/coco_stuff_164k/'
DATA_COCO_TEST = 'None'
DATALIST_COCO_TRAIN = './dataset/list/coco_stuff_164k/coco_stuff_164k_train.txt'
DATALIST_COCO_VAL = './dataset/list/coco_stuff_164k/coco_stuff_164k_val.txt'
DATALIST_COCO_TEST = 'None'
